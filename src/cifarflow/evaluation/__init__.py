"""Evaluation: metrics of predicted probabilities (`metrics`), one scoring path (`scoring`), evaluation runs (`evaluator`), voting ensembles (`ensemble`, `voting`) and run comparison (`compare`)."""
