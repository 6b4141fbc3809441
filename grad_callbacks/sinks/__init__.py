"""Where findings and metrics go: Python warnings, TensorBoard, the JSON report."""
