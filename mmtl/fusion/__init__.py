"""Token-level fusion of frozen towers: gated cross-attention (Flamingo), late fusion, VQA / ITM heads,
the ``cross_attention`` train module and driver, export loading (evaluation: :mod:`mmtl.eval.fusion_eval`)."""
