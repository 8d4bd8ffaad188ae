"""Fine-tuning stages (SFT, reward model, PPO/DPO, classification) that plug into the loop."""
