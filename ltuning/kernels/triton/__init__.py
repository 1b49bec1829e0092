"""Triton kernels of shared-prefix attention (GPU, or the CPU interpreter with ``TRITON_INTERPRET=1``).

:mod:`.prefix_attention`: the launcher and autograd function (the ``"triton"`` backend of
:func:`ltuning.kernels.prefix_attention`); :mod:`.fwd` / :mod:`.bwd`: the forward and backward kernels;
:mod:`.common`: helpers shared by both; :mod:`.configs`: autotuning spaces. Triton itself is imported only when a
kernel runs.
"""
