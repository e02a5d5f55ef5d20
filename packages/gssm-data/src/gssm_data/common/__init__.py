"""Utilities both command lines share: counts and messages as people read them, bounded YAML
files, progress for terminals and logs, thread and memory resources, the installed version.

They know nothing about graphs or stores: gssm_data's own modules and llama_train import
them, and they import nothing of gssm_data but :mod:`gssm_data.errors`.
"""
