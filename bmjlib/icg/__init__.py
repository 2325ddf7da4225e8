"""Step 10, interpretable counterfactuals (ProgEmu / ICG-CXR): what did each image change, said in words.

interpret      difference maps, findings and the interpretation text of one pair
interpret_run  notebook 10: every counterfactual of a run, its score, the ICG-CXR export
"""
