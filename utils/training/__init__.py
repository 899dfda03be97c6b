"""Training pieces the loop in fsdp_finetune.py is made of: loss terms, masks, parallel strategies, one optimizer step, resumable state."""
