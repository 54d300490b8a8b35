"""jaxnets: classic deep networks as pure JAX functions you can jit, grad, vmap and inspect.

Submodules (import what you need; nothing runs on import):

- ``jaxnets.rnn``: RNN/LSTM/GRU step functions and Flax layers with PyTorch semantics.
- ``jaxnets.bptt``: per-step Jacobians, explicit BPTT, spectra, Lyapunov exponents.
- ``jaxnets.models``: VGG and ResNet families (2D and 1D), small baselines.
- ``jaxnets.seq``: sequence models (classifier, language model, tagger, seq2seq).
- ``jaxnets.transfer``: parameter groups, freezing, per-group learning rates.
- ``jaxnets.data``: offline data sets and seeded batch iterators.
- ``jaxnets.train``: train state, jit-compiled steps, the loop, checkpoints.
- ``jaxnets.runs``: run directories, configs, results.
- ``jaxnets.plots``: matplotlib figures (Agg backend).
"""

__version__ = "0.1.0"
