"""The HTTP API's routes, one module per area, each a ``router()`` that :func:`medret.serve.app.create_app` includes.

- :mod:`~medret.serve.routes.page`: the web page;
- :mod:`~medret.serve.routes.status`: health, metrics and the table list;
- :mod:`~medret.serve.routes.search`: search by upload, by item, an item and its thumbnail;
- :mod:`~medret.serve.routes.slides`: slide-level search (the slide list, by slide, by region).

Handlers are module-level functions; they reach the replica's
:class:`~medret.serve.service.Service` through :func:`~medret.serve.routes.deps.get_service`.
Routers are built per app, so what they describe (the query modes of the kinds registered
now) is read when the app is built, not when this package is imported.
"""
