"""``mixinfer import``: an exported ONNX image classifier plus labelled images -> a served, calibrated MI bundle."""
