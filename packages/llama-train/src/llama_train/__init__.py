"""A Llama-style trainer for gssm-data stores."""
