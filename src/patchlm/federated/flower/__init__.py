"""Flower apps for federated LoRA: server_app (ServerApp), client_app (ClientApp), strategy (the Strategy that
calls patchlm.federated.rules), task (data, local training, evaluation), deploy (a local SuperLink + SuperNodes),
run (what `patchlm federate` calls)."""
