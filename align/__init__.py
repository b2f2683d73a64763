"""tandem.align: SFT, reward models, DPO, PPO and GRPO on optax, rollouts from the serving engine.

trainer.py, train_step.py   the generic loop (`fit`) and the jitted step; checkpoint.py,
                            metrics_log.py, plot.py beside them
sft.py, dpo.py              offline trainers; reward_trainer.py trains reward_model.py's model
losses/                     pure losses, `(loss, metrics)`, found by name (`get_loss`)
data/                       records -> examples -> grain batches; preference pairs
rl/                         rollouts, rewards, advantages, and the PPO and GRPO trainers
registry.py                 the one registry of named functions (losses, advantages, rewards)
algo_configs.py, train_config.py   what gin binds
"""
