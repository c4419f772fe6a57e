"""Text in: registry assets (models and texts), corpora and token windows, record data through `datasets`."""
