"""Reading finished or running run directories, without torch.

- :mod:`~llama_train.analysis.runs`: run directories as curves and figures for plots and notebooks;
- :mod:`~llama_train.analysis.plot`: `llama-train plot`, one PNG for one run or many;
- :mod:`~llama_train.analysis.html_report`: `llama-train report`, the same figures as one HTML file;
- :mod:`~llama_train.analysis.status`: where the points of a sweep stand, and which one won;
- :mod:`~llama_train.analysis.wandb_sync`: run directories replayed into wandb.

Beside :mod:`llama_train.scaling`, above the leaves only: importing this package or any
module in it loads no torch, so reading results is quick on any machine.
"""
