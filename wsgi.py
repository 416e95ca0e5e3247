"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``. Settings come from RIVULET_* variables."""
from service import create_app

app = create_app()
