"""Flower apps for federated LoRA, laid out as Flower's examples do: server_app (ServerApp), client_app
(ClientApp), strategy (the Strategy that calls patchlm.federated.rules), task (data, local training on the engine,
evaluation), wire (how broadcasts and replies are packed into Flower records), history (what a client verifies and
caches of the global history), faults (test-only fault injection), deploy (a local SuperLink + SuperNodes), run
(what `patchlm federate` calls)."""
