"""One module per DVC stage: read its params section, call the layers below, write its declared outs."""
