"""DIITO: causal distillation of BERT-style text classifiers."""
