"""A model on disk, in and out: our checkpoints, Hugging Face directories, GGUF files."""
