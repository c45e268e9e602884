"""Views of a database: ``sat export`` (``export``), the HTML gallery and its assets, ``sat show``, ``sat search``."""
