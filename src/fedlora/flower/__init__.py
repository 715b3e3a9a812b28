"""fedlora's methods on Flower: a Message-API strategy (strategy.py), a ClientApp (client_app.py) and a
ServerApp (server_app.py) that call the very method objects, local training, update checks and byte counts
of the in-process simulator; Flower only carries the payloads. project.py writes a ready app project."""
