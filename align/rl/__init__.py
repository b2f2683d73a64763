"""Online RL: rollouts through the serving engine, rewards, advantages, and the PPO and GRPO
trainers built from them (common.py holds what the two share)."""
