"""layertrack compute side: checkpoint loading, probe corpus, metric engine, scoring."""
