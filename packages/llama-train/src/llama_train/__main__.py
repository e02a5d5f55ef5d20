"""`python -m llama_train` is `llama-train` (torchrun launches modules this way)."""

from llama_train.cli import main

if __name__ == "__main__":
    main()
