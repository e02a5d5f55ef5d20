"""Scaling laws from training runs, without torch.

- :mod:`llama_train.scaling.compute`: parameter and FLOP accounting (also used by the
  training recipe for summary.json);
- :mod:`llama_train.scaling.points`: one table row per finished point of a study;
- :mod:`llama_train.scaling.fit`: L(N, D) = E + A/N^alpha + B/D^beta fits (Chinchilla's
  approach 3), bootstrap intervals, compute-optimal allocation;
- :mod:`llama_train.scaling.plots`: the study's figures.

Nothing here imports torch, so fitting and plotting a table of results is quick
and works on any machine.
"""
