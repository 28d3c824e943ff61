"""Thin frontends over `engine.Engine`: the offline tool and the websocket server."""
