"""Reporting to the Trainer's loggers (rank zero): TensorBoard scalars, histograms, tables and images of
closed windows, audit reports and selection decisions. Imports Lightning's logger classes only."""
