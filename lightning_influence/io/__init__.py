"""Files: appended JSON lines, atomic writes, and the artifact formats (windows, final scores, audit,
selection decisions). No Lightning."""
