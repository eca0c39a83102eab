"""Other ecosystems' formats: Hugging Face transformers settings and weights, both ways (`huggingface.py`)."""
