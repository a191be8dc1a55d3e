"""Where work runs: the ``domainsynth`` CLI, the Ray connection, job submission and Kubernetes rendering."""
