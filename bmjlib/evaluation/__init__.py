"""Steps 06-09, evaluation (paper §4.3, §5): generation over the test pairs, judges, scores, tables, figures.

counterfactuals  every model's counterfactuals for the test pairs (§5.1)
metrics          CMIG, AUROC, SSIM and the bootstrap (§4.3)
judges           the demo judges trained on the phantom
judges_xrv       the paper's torchxrayvision judges
evaluate         scoring each source with the judges (Tables 1, 3, 4)
tables           the paper's tables with our numbers beside theirs
figures          Figs. 3, 4, 5, 9
ablations        Tables 2 and 5
"""
