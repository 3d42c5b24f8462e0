from setuptools import setup

setup(
    name="stagetools",
    version="1.0.0",
    description="Staged Python web installations whose settings, paths, database and "
                "service units follow from the installation's name",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    py_modules=["stagetools", "stagetools_django"],
    python_requires=">=3.9",
    install_requires=[],
    extras_require={
        "test": [
            "pytest", "hypothesis", "vermin", "Django>=4.2", "Flask", "starlette",
            "uvicorn", "hypercorn", "gunicorn", "psycopg[binary]",
        ],
    },
    entry_points={"console_scripts": ["stagetools = stagetools:main"]},
    license="MIT",
)
