"""The train family: DPO with LoRA (`dpo`), implicit-reward scoring (`reward-eval`) and training curves (`plot`)."""
