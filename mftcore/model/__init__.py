"""The HF model side: load (load.py), run to hidden states (decoder.py), build for training with
precision, adapters and activation checkpointing (build.py, lora.py), the per-family facts the HF config
does not give (families.py), the mftcore_varlen attention backend (attention.py), the decoder + fused
loss unit the engines wrap (loss_model.py), the MoE auxiliary loss (moe.py) and the chat template that
reproduces the training string (chat_template.py)."""
