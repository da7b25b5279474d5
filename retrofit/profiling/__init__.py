"""Profiling: parameters, MACs, element operations and latency of a model, one concept per module.

* :mod:`.profile` — :func:`~.profile.profile` and the :class:`~.profile.Profile` it returns,
  exported as ``retrofit.profile`` and ``retrofit.Profile``. (No module of the package is
  called ``retrofit.profile``: importing one would replace the function ``retrofit.profile``
  with the module.)
* :mod:`.rules` — the counting rules: which aten op costs what (attention, element operations,
  data movement), and which labels the fvcore-style total adds.
* :mod:`.counter` — one counted forward pass: ``FlopCounterMode`` with those rules, plus a recorder
  of every op that ran, so an op without a rule is reported instead of dropped.
* :mod:`.probe` — the probe input, eval mode under ``no_grad``, and the forward call itself.
* :mod:`.costs` — the row types: :class:`.costs.Cost` and :class:`.costs.ModuleCost`.
* :mod:`.sites` — one row per inserted attention block of a retrofitted model.
* :mod:`.latency` — forward-pass wall time.
* :mod:`.report` — the CLI's target: a model name, or a checkpoint beside its base architecture.
"""
