"""Scaling laws from training runs, without torch.

- :mod:`llama_train.scaling.compute`: parameter and FLOP accounting (also used by the
  training recipe for summary.json);
- :mod:`llama_train.scaling.points`: one table row per finished point of a study;
- :mod:`llama_train.scaling.fit`: L(N, D) = E + A/N^alpha + B/D^beta fits (Chinchilla's
  approach 3), the table checks every fit shares, compute-optimal allocation;
- :mod:`llama_train.scaling.vpnls`: the same law by variable projection (the default);
- :mod:`llama_train.scaling.methods`: which of the two a fit uses;
- :mod:`llama_train.scaling.bootstrap`: resampling run groups, honest intervals;
- :mod:`llama_train.scaling.approaches`: Chinchilla's approaches 1 (frontier) and 2
  (isoFLOP);
- :mod:`llama_train.scaling.validate`: holdout, leave-future-out and recovery checks;
- :mod:`llama_train.scaling.plots`: the study's figures.

Nothing here imports torch, so fitting and plotting a table of results is quick
and works on any machine.
"""
