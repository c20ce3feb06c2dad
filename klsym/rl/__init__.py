"""RL: the chain applied to reinforcement learning of language models (framework crosswalk, log-prob API)."""
