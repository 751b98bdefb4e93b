"""The generator of the simulated ``students`` dataset (``lmmfast.datasets.load("students")``).

Students nested in classrooms, nested in schools, nested in provinces; every student sits
several tests, half a year apart.  The shipped file ``students.csv.gz`` is exactly
``simulate_students()`` with its defaults (10 provinces × 5 schools × 4 classrooms × 15
students × 3 tests = 9,000 rows)::

    from lmmfast.datasets.students import simulate_students
    simulate_students().to_csv("students.csv.gz", index=False)

Columns
-------
test_score : float
    The response.
age : float
    Age in years at the test (two decimals).
sex : str
    ``"F"`` or ``"M"``.
classroom, school, province : str
    Labels that are unique across the whole dataset (``"p03-s2-c1"`` is classroom 1 of
    school 2 of province 3), so ``classroom`` alone identifies a classroom and
    ``school:classroom`` defines the same partition of the rows as ``classroom``.
student_id : str
    ``"p03-s2-c1-st07"``; each student has ``n_tests`` rows.

True model
----------
With ``a = age - 12`` (age centred at 12 years)::

    test_score = 60 + 2.5 a - 1.5 [sex == "M"]
                 + u_province + u_school + u_classroom + v_classroom a + u_student + e

=======================================  ===========  ==========
effect                                   SD           variance
=======================================  ===========  ==========
province intercept ``u_province``        4.0          16.0
school intercept ``u_school``            3.0          9.0
classroom intercept ``u_classroom``      2.5          6.25
classroom age slope ``v_classroom``      1.0          1.0
corr(``u_classroom``, ``v_classroom``)   0.3
student intercept ``u_student``          5.0          25.0
residual ``e``                           6.0          36.0
=======================================  ===========  ==========

In terms of the raw ``age`` column (as the model ``test_score ~ age + sex +
(age|classroom) + ...`` is parameterised) the fixed intercept is ``60 - 12 × 2.5 = 30``,
and the classroom intercept at age 0 has variance ``6.25 - 2 × 12 × 0.75 + 144 × 1 =
132.25`` and covariance ``0.75 - 12 = -11.25`` with the slope (correlation ≈ −0.98): the
intercept of an uncentred random-slope model describes a child of age 0.

Ages: each classroom has a base age drawn from 10, 11, ..., 14; a student's age at the first
test is the base age plus a uniform (0, 1) birthday offset, and tests follow every 0.4 years.
At ages near 12 the true variance partition of a random-intercept-only reading is: province
16 / 92.25 ≈ 0.17, school ≈ 0.10, classroom ≈ 0.07, student ≈ 0.27, residual ≈ 0.39.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["simulate_students", "TRUE_PARAMETERS"]

#: The parameters the shipped data were simulated with (age centred at 12 years).
TRUE_PARAMETERS = {
    "intercept": 60.0,          # at age 12, sex F
    "age": 2.5,                 # per year
    "sexM": -1.5,
    "sd_province": 4.0,
    "sd_school": 3.0,
    "sd_classroom": 2.5,
    "sd_classroom_age": 1.0,
    "cor_classroom": 0.3,
    "sd_student": 5.0,
    "sd_residual": 6.0,
    "age_centre": 12.0,
}


def simulate_students(seed: int = 20240611, n_provinces: int = 10, n_schools: int = 5,
                      n_classrooms: int = 4, n_students: int = 15, n_tests: int = 3,
                      params: dict | None = None) -> pd.DataFrame:
    """Simulate test scores of students in classrooms in schools in provinces.

    Parameters
    ----------
    seed : int
        Seed of the ``numpy.random.default_rng`` generator; the default reproduces the
        shipped dataset.
    n_provinces, n_schools, n_classrooms, n_students, n_tests : int
        Provinces; schools per province; classrooms per school; students per classroom;
        tests per student.
    params : dict, optional
        Overrides of :data:`TRUE_PARAMETERS` (same keys).

    Returns
    -------
    DataFrame
        Columns test_score, age, sex, classroom, school, province, student_id; one row per
        test, ordered by student and test.

    Examples
    --------
    >>> df = simulate_students(n_provinces=2, n_schools=2, n_classrooms=2, n_students=3)
    >>> df.shape
    (72, 7)
    """
    p = dict(TRUE_PARAMETERS)
    if params:
        unknown = set(params) - set(p)
        if unknown:
            raise KeyError(f"unknown parameters {sorted(unknown)}; known: {sorted(p)}")
        p.update(params)
    rng = np.random.default_rng(seed)
    n_cls = n_provinces * n_schools * n_classrooms
    prov_of_school = np.repeat(np.arange(n_provinces), n_schools)
    school_of_cls = np.repeat(np.arange(n_provinces * n_schools), n_classrooms)

    u_prov = rng.normal(0.0, p["sd_province"], n_provinces)
    u_school = rng.normal(0.0, p["sd_school"], n_provinces * n_schools)
    s0, s1, r = p["sd_classroom"], p["sd_classroom_age"], p["cor_classroom"]
    cov = np.array([[s0 * s0, r * s0 * s1], [r * s0 * s1, s1 * s1]])
    u_cls = rng.multivariate_normal(np.zeros(2), cov, n_cls, method="cholesky")
    base_age = rng.integers(10, 15, n_cls)

    n_stu = n_cls * n_students
    cls_of_stu = np.repeat(np.arange(n_cls), n_students)
    u_stu = rng.normal(0.0, p["sd_student"], n_stu)
    male = rng.random(n_stu) < 0.5
    age0 = base_age[cls_of_stu] + rng.random(n_stu)

    stu = np.repeat(np.arange(n_stu), n_tests)
    occasion = np.tile(np.arange(n_tests), n_stu)
    age = np.round(age0[stu] + 0.4 * occasion, 2)
    cls = cls_of_stu[stu]
    school = school_of_cls[cls]
    prov = prov_of_school[school]
    a = age - p["age_centre"]
    y = (p["intercept"] + p["age"] * a + p["sexM"] * male[stu]
         + u_prov[prov] + u_school[school] + u_cls[cls, 0] + u_cls[cls, 1] * a + u_stu[stu]
         + rng.normal(0.0, p["sd_residual"], len(stu)))

    w = len(str(n_students))
    prov_lab = np.array([f"p{i + 1:02d}" for i in range(n_provinces)], dtype=object)
    school_lab = np.array([f"{prov_lab[prov_of_school[s]]}-s{s % n_schools + 1}"
                           for s in range(n_provinces * n_schools)], dtype=object)
    cls_lab = np.array([f"{school_lab[school_of_cls[c]]}-c{c % n_classrooms + 1}"
                        for c in range(n_cls)], dtype=object)
    stu_lab = np.array([f"{cls_lab[cls_of_stu[s]]}-st{s % n_students + 1:0{max(w, 2)}d}"
                        for s in range(n_stu)], dtype=object)
    return pd.DataFrame({
        "test_score": np.round(y, 2),
        "age": age,
        "sex": np.where(male[stu], "M", "F").astype(object),
        "classroom": cls_lab[cls],
        "school": school_lab[school],
        "province": prov_lab[prov],
        "student_id": stu_lab[stu],
    })


if __name__ == "__main__":  # pragma: no cover  (regenerates the shipped file)
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "students.csv.gz"
    simulate_students().to_csv(out, index=False)
    print(f"wrote {out}")
