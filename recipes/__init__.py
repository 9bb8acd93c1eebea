"""DeepSeek-R1's recipes around the training loop (cluster/): the stage runner (recipe.py) and
the stages that are not GRPO: SFT, rejection sampling, reward-model training, distillation."""
