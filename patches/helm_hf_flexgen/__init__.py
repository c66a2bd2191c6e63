"""HELM (crfm-helm) on hf_flexgen: a client (``client.FlexGenClient``) for model deployments,
and ``prod_env`` to write the deployment files for a local checkpoint. ``runner`` and
``batcher`` hold the parts that do not need HELM."""
