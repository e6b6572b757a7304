"""The application, the top floor: the service's lifecycle (:mod:`app.application`) and the
``metallm`` command line (:mod:`app.cli`). It builds the edges (``consumers``) and the core
(``service``) and runs them; nothing below imports it."""
