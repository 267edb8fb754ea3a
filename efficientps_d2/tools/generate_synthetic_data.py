"""Generate the built-in synthetic panoptic data set ahead of time (training on it otherwise
generates it on first use)::

    python -m efficientps_d2.tools.generate_synthetic_data --root datasets --num-train 200

The command line of :func:`efficientps_d2.data.synthetic.main`, started from here: run as
``python -m efficientps_d2.data.synthetic``, that module would execute a second time after its
package had imported it, and Python warns about that on every run.
"""

from efficientps_d2.data.synthetic import main

if __name__ == "__main__":
    main()
