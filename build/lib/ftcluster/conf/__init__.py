# Makes the YAML config groups importable as the `ftcluster.conf` package (pyproject maps this
# directory there), so a non-editable install finds them from any working directory.
