"""Stage 3: Unified Knowledge Distillation pretraining (`gpfm pretrain`); see trainer.py for the loop and
GPFM-METHOD.md §2 for the method. Import submodules directly (this package imports nothing heavy)."""
