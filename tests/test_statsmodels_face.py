"""The statsmodels-style face ``lmmfast.formula.api`` (issue: "so Python users' existing code runs").

Every snippet of the issue is run literally (``pd.read_csv("students.csv")`` from a temporary
directory) and each fit is compared with the equivalent ``lmmfast.lmer`` model.
"""
import contextlib
import io
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import lmmfast
import lmmfast.formula.api as smf
from lmmfast.errors import DataError, FormulaError
from lmmfast.formula import MixedLM, MixedLMResults, SamePartitionWarning
from lmmfast.formula.translate import same_partitions

SNIPPET = '''
import pandas as pd
import lmmfast.formula.api as smf
data = pd.read_csv("students.csv")   # test_score, age, sex, classroom, school, province, student_id

formula = "test_score ~ age + sex + (1|classroom) + (1|school) + (1|province)"
model = smf.mixedlm(formula, data, groups=data["student_id"]).fit()

formula = "test_score ~ age + sex + (age|classroom) + (1|school) + (1|province)"
model = smf.mixedlm(formula, data, groups=data["student_id"]).fit()

vc_formula = {"classroom": "diag", "school": "diag", "province": "diag"}
model = smf.mixedlm(formula, data, groups=data["student_id"], vc_formula=vc_formula).fit()

re_formula = {"classroom": "~1", "school": "~1", "province": "~1"}
model = smf.mixedlm(formula, data, groups=data["student_id"], re_formula=re_formula).fit()

for formula in ["test_score ~ age + sex + (age|classroom) + (age|school) + (age|province)",
                "test_score ~ age + sex + (1|classroom) + (1|school:classroom)",
                "test_score ~ age + sex + (1|classroom) + (1|school) + (1|province) + (1|student_id)"]:
    print(smf.mixedlm(formula, data).fit().summary())
'''

FE = "test_score ~ age + sex"
A = f"{FE} + (1|classroom) + (1|school) + (1|province) + (1|student_id)"
B = f"{FE} + (age|classroom) + (1|school) + (1|province) + (1|student_id)"
C = f"{FE} + (age||classroom) + (1|school) + (1|province) + (1|student_id)"
D = f"{FE} + (age|classroom) + (age|school) + (age|province)"
E = f"{FE} + (1|classroom) + (1|school:classroom)"
# the lme4 model each snippet fit is equivalent to, in the order the snippet fits them
EQUIVALENT = [A, B, C, B, D, E, A]


@pytest.fixture(scope="module")
def data():
    return lmmfast.datasets.load("students")


@pytest.fixture(scope="module")
def snippet_run(tmp_path_factory):
    """Run the issue's code literally; record every MixedLM, its fit, warnings and output."""
    d = tmp_path_factory.mktemp("students")
    lmmfast.datasets.load("students").to_csv(d / "students.csv", index=False)
    fits = []
    orig = MixedLM.fit

    def recording_fit(self, *a, **k):
        res = orig(self, *a, **k)
        fits.append(res)
        return res

    out = io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.setattr(MixedLM, "fit", recording_fit)
    mp.chdir(d)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            exec(compile(SNIPPET, "issue_snippet", "exec"), {})
    finally:
        mp.undo()
    return fits, caught, out.getvalue()


_REFS = {}


def reference(formula, data, REML=True):
    key = (formula, REML)
    if key not in _REFS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _REFS[key] = lmmfast.lmer(formula, data, REML=REML)
    return _REFS[key]


def assert_same_fit(res, ref):
    fit = res.lmer_fit if isinstance(res, MixedLMResults) else res
    assert fit.objective == pytest.approx(ref.objective, rel=1e-6)
    np.testing.assert_allclose(fit.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.theta, ref.theta, rtol=1e-4, atol=1e-5)
    assert fit.sigma == pytest.approx(ref.sigma, rel=1e-5)


# ------------------------------------------------------------------------ the snippets
def test_snippet_runs_literally(snippet_run):
    fits, _, out = snippet_run
    assert len(fits) == 7
    assert out.count("Mixed Linear Model Regression Results") == 3
    assert all(isinstance(r, MixedLMResults) for r in fits)


@pytest.mark.parametrize("i", range(7))
def test_snippet_matches_lmer(snippet_run, data, i):
    res = snippet_run[0][i]
    assert_same_fit(res, reference(EQUIVALENT[i], data))


def test_snippet_translations(snippet_run):
    got = [r.model.lme4_formula for r in snippet_run[0]]
    assert got[0] == f"{FE} + (1 | classroom) + (1 | school) + (1 | province) + (1 | student_id)"
    assert got[1] == f"{FE} + (1 + age | classroom) + (1 | school) + (1 | province) + (1 | student_id)"
    assert got[2] == (f"{FE} + (1 | classroom) + (0 + age | classroom) + (1 | school) + (1 | province)"
                      " + (1 | student_id)")
    assert got[3] == got[1]               # {"classroom": "~1"} adds nothing to (age|classroom)


def test_snippet_warns_only_for_same_partition(snippet_run):
    caught = snippet_run[1]
    same = [w for w in caught if issubclass(w.category, SamePartitionWarning)]
    assert len(same) == 1
    msg = str(same[0].message)
    assert "'classroom'" in msg and "'school:classroom'" in msg and "cannot be told apart" in msg


def test_same_partition_fit_matches_lme4_objective(snippet_run):
    # lme4 4.x (R) gives REML criterion 63174.1856921 for this model on the shipped data
    res = snippet_run[0][5]
    assert res.lmer_fit.objective == pytest.approx(63174.1856921, abs=1e-3)
    assert res.model.partitions == [("classroom", "school:classroom")]
    assert "define the same groups" in str(res.summary())


def test_snippet_lme4_reference_objectives(snippet_run):
    """REML criteria lme4 (R) reaches on the shipped data; lmmfast must be at least as low."""
    fits = snippet_run[0]
    assert fits[0].lmer_fit.objective == pytest.approx(61660.4255219, abs=1e-3)
    assert fits[1].lmer_fit.objective <= 61643.3675428 + 1e-3


# ------------------------------------------------------------------------ argument mapping
@pytest.mark.parametrize("formula, kwargs, expected", [
    ("test_score ~ age + (age|classroom)", {"re_formula": {"classroom": "~1"}},
     "(1 + age | classroom)"),
    ("test_score ~ age + (1|classroom)", {"re_formula": {"classroom": "~age"}},
     "(1 + age | classroom)"),
    ("test_score ~ age + (0 + age|classroom)", {"re_formula": {"classroom": "~1"}},
     "(1 + age | classroom)"),
    ("test_score ~ age + (1|classroom)", {"re_formula": {"school": "~ 1 + age"}},
     "(1 | classroom) + (1 + age | school)"),
    ("test_score ~ age + (age||classroom)", {"re_formula": {"classroom": "~1"}},
     "(1 | classroom) + (0 + age | classroom)"),
    ("test_score ~ age + (0 + age||classroom)", {"re_formula": {"classroom": "~1"}},
     "(1 + age | classroom)"),                  # one term: the union
    ("test_score ~ age", {"groups": "classroom"}, "(1 | classroom)"),
    ("test_score ~ age", {"groups": "classroom", "re_formula": "~age"}, "(1 + age | classroom)"),
    ("test_score ~ age", {"groups": "classroom", "re_formula": "0 + age"}, "(0 + age | classroom)"),
    ("test_score ~ age + (1|school)", {"groups": "classroom", "re_formula": "~age"},
     "(1 | school) + (1 + age | classroom)"),
    ("test_score ~ age + (age|classroom)", {"vc_formula": {"classroom": "diag"}},
     "(1 | classroom) + (0 + age | classroom)"),
    ("test_score ~ age + (age||classroom)", {"vc_formula": {"classroom": "full"}},
     "(1 + age | classroom)"),
    ("test_score ~ age + (age||classroom)", {"vc_formula": {"classroom": "unstructured"}},
     "(1 + age | classroom)"),
    ("test_score ~ age + (1|classroom)", {"vc_formula": {"school": "diag"}},
     "(1 | classroom) + (1 | school)"),
    ("test_score ~ age + (1|classroom)", {"re_formula": {"classroom": "~age"},
                                           "vc_formula": {"classroom": "diag"}},
     "(1 | classroom) + (0 + age | classroom)"),
    ("test_score ~ age", {"groups": "school", "vc_formula": {"classroom": "0 + C(classroom)"}},
     "(1 | school) + (1 | school:classroom)"),
    ("test_score ~ age", {"groups": "school", "vc_formula": {"cl": "0 + C(classroom):age"}},
     "(1 | school) + (0 + age | school:classroom)"),
    ("test_score ~ age", {"groups": "school", "vc_formula": {"a": "0 + age"}},
     "(1 | school) + (0 + age | school)"),
    ("test_score ~ age + (1|school/classroom)", {}, "(1 | classroom:school) + (1 | school)"),
])
def test_translation(data, formula, kwargs, expected):
    m = smf.mixedlm(formula, data, **kwargs)
    assert m.lme4_formula == "test_score ~ age + " + expected


def test_vc_diag_is_double_bar(data):
    f = "test_score ~ age + sex + (age|classroom) + (1|school)"
    res = smf.mixedlm(f, data, vc_formula={"classroom": "diag"}).fit()
    assert_same_fit(res, reference(f"{FE} + (age||classroom) + (1|school)", data))


def test_dict_re_formula_union_fit(data):
    f = "test_score ~ age + sex + (1|classroom) + (1|school)"
    res = smf.mixedlm(f, data, re_formula={"classroom": "~1 + age", "school": "~1"}).fit()
    assert_same_fit(res, reference(f"{FE} + (1 + age|classroom) + (1|school)", data))


def test_statsmodels_variance_component_fit(data):
    res = smf.mixedlm("test_score ~ age + sex", data, groups="school",
                      vc_formula={"classroom": "0 + C(classroom)"}).fit()
    assert_same_fit(res, reference(f"{FE} + (1|school) + (1|school:classroom)", data))


def test_unknown_structure_lists_known_ones(data):
    with pytest.raises(FormulaError) as e:
        smf.mixedlm("test_score ~ age + (age|classroom)", data, vc_formula={"classroom": "diagonally"})
    msg = str(e.value)
    assert "'diagonally'" in msg
    for name in ("'diag'", "'full'", "'unstructured'"):
        assert name in msg


@pytest.mark.parametrize("kwargs, match", [
    ({"re_formula": "~age"}, "no groups= was given"),
    ({"vc_formula": {"classroom": "0 + C(classroom)"}}, "nested in groups="),
    ({"groups": "school", "vc_formula": {"classroom": "C(classroom)"}}, "intercept"),
    ({"groups": "school", "vc_formula": {"c": "0 + C(classroom) + age"}}, "single term"),
    ({"vc_formula": ["diag"]}, "must be a dict"),
    ({"re_formula": {"school/classroom": "~1"}}, "'/'"),
    ({"re_formula": {"classroom": ""}}, "empty"),
])
def test_specification_errors(data, kwargs, match):
    with pytest.raises(FormulaError, match=match):
        smf.mixedlm("test_score ~ age + (1|province)", data, **kwargs)


def test_no_random_effects_is_an_error(data):
    with pytest.raises(FormulaError, match="no random effects"):
        smf.mixedlm("test_score ~ age", data)


def test_groups_with_one_row_each_is_refused(data):
    one = data.groupby("student_id").head(1).reset_index(drop=True)
    with pytest.raises(DataError, match="cannot be told apart from the residual") as e:
        smf.mixedlm("test_score ~ age + sex + (1|classroom)", one, groups=one["student_id"])
    assert "groups='student_id'" in str(e.value)
    with pytest.raises(DataError):       # lme4 (and lmer) refuse the same model
        lmmfast.lmer("test_score ~ age + sex + (1|classroom) + (1|student_id)", one)


def test_one_level_factor_is_refused(data):
    d = data.assign(country="NL")
    with pytest.raises(DataError, match="at least 2 levels"):
        smf.mixedlm("test_score ~ age + (1|country)", d)
    with pytest.raises(DataError, match="at least 2 levels"):
        smf.mixedlm("test_score ~ age + (1|classroom)", d, groups="country")


def test_same_partitions_up_to_relabelling():
    class T:
        def __init__(self, g, codes):
            self.group, self.codes = g, np.asarray(codes)
            self.nlevels = len(set(codes))

    terms = [T("a", [0, 0, 1, 1, 2]), T("b", [2, 2, 0, 0, 1]), T("c", [0, 1, 1, 0, 2]),
             T("a", [0, 0, 1, 1, 2])]
    assert same_partitions(terms) == [("a", "b")]


def test_no_warning_for_distinct_partitions(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamePartitionWarning)
        smf.mixedlm("test_score ~ age + (1|classroom) + (1|school)", data)


# ------------------------------------------------------------------------ groups=, data handling
def test_groups_series_added_to_a_copy(data):
    before = data.copy()
    kid = pd.Series(data["student_id"].to_numpy(), name="kid")
    m = smf.mixedlm("test_score ~ age + (1|classroom)", data, groups=kid)
    assert m.groups == "kid" and "kid" in m.data.columns and "kid" not in data.columns
    pd.testing.assert_frame_equal(data, before)
    m2 = smf.mixedlm("test_score ~ age + (1|classroom)", data, groups=data["student_id"].to_numpy())
    assert m2.groups == "groups" and m2.lme4_formula.endswith("(1 | groups)")
    m3 = smf.mixedlm("test_score ~ age + (1|classroom)", data, groups=data["student_id"])
    assert m3.groups == "student_id" and m3.data is data


def test_groups_length_checked(data):
    with pytest.raises(DataError, match="length"):
        smf.mixedlm("test_score ~ age", data, groups=data["student_id"].to_numpy()[:10])


def test_missing_and_subset(data):
    d = data.copy()
    d.loc[[3, 7], "age"] = np.nan
    m = smf.mixedlm("test_score ~ age + (1|classroom)", d)
    assert m.nobs == len(d) - 2
    with pytest.raises(DataError, match="missing"):
        smf.mixedlm("test_score ~ age + (1|classroom)", d, missing="raise")
    sub = smf.mixedlm("test_score ~ age + (1|classroom)", data, subset=data["province"] != "p01")
    assert sub.nobs == int((data["province"] != "p01").sum())


# ------------------------------------------------------------------------ fit() keywords
def test_fit_keywords(data):
    f = "test_score ~ age + sex + (1|classroom) + (1|school)"
    m = smf.mixedlm(f, data)
    ml = m.fit(reml=False, method=["lbfgs"], maxiter=5000, full_output=True, niter_sa=2, gtol=1e-6)
    assert ml.method == "ML" and not ml.reml
    assert_same_fit(ml, reference(f, data, REML=False))
    assert_same_fit(m.fit(REML=True, method="bobyqa"), reference(f, data))
    assert m.fit(method="nloptwrap").lmer_fit.optsummary.optimizer == "bobyqa"
    with pytest.raises(NotImplementedError, match="fe_pen"):
        m.fit(fe_pen=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        m.fit(method="simplex-annealing")
    with pytest.raises(TypeError, match="unexpected keyword"):
        m.fit(tolerance=1e-3)
    with pytest.warns(UserWarning, match="start_params is ignored"):
        m.fit(start_params=np.ones(5))


def test_from_formula_alias(data):
    m = MixedLM.from_formula("test_score ~ age", data, groups="classroom")
    assert m.lme4_formula == "test_score ~ age + (1 | classroom)"


# ------------------------------------------------------------------------ results: names and math
@pytest.fixture(scope="module")
def multi(data):
    res = smf.mixedlm("test_score ~ age + sex + (1|classroom) + (1|school) + (1|province)", data,
                      groups=data["student_id"]).fit()
    return res, reference(A, data)


def test_fixed_effect_inference_math(multi):
    res, ref = multi
    V = ref.vcov.to_numpy()
    beta = ref.fixef.to_numpy()
    se = np.sqrt(np.diag(V))
    assert list(res.fe_params.index) == ["Intercept", "age", "sex[T.M]"]
    np.testing.assert_allclose(res.fe_params.to_numpy(), beta)
    np.testing.assert_allclose(res.bse_fe.to_numpy(), se)
    k = len(beta)
    np.testing.assert_allclose(res.bse.to_numpy()[:k], se)
    assert np.isnan(res.bse.to_numpy()[k:]).all()
    np.testing.assert_allclose(res.tvalues.to_numpy()[:k], beta / se)
    np.testing.assert_allclose(res.pvalues.to_numpy()[:k], 2 * stats.norm.sf(np.abs(beta / se)))
    ci = res.conf_int()
    q = stats.norm.ppf(0.975)
    np.testing.assert_allclose(ci[0].to_numpy()[:k], beta - q * se)
    np.testing.assert_allclose(ci[1].to_numpy()[:k], beta + q * se)
    ci90 = res.conf_int(alpha=0.1, cols=["age"])
    np.testing.assert_allclose(ci90.to_numpy().ravel(),
                               beta[1] + np.array([-1, 1]) * stats.norm.ppf(0.95) * se[1])
    cp = res.cov_params()
    np.testing.assert_allclose(cp.iloc[:k, :k].to_numpy(), V)


def test_variance_parameters(multi):
    res, ref = multi
    vc = ref.varcorr.set_index("grp")["vcov"]
    names = ["student_id Var", "classroom Var", "school Var", "province Var"]
    assert list(res.params.index[3:]) == names
    for g in ("student_id", "classroom", "school", "province"):
        assert res.params[f"{g} Var"] == pytest.approx(vc[g])
        assert res.vcomp[f"{g} Var"] == pytest.approx(vc[g])
        assert res.cov_re[g].loc[g, g] == pytest.approx(vc[g])
        assert res.cov_re_unscaled[g].loc[g, g] == pytest.approx(vc[g] / ref.sigma ** 2)
    assert res.scale == pytest.approx(ref.sigma ** 2)


def test_fit_statistics_and_values(multi, data):
    res, ref = multi
    assert res.llf == pytest.approx(ref.loglik)
    assert res.aic == pytest.approx(ref.aic) and res.bic == pytest.approx(ref.bic)
    assert res.converged is True and res.nobs == len(data) == ref.nobs
    np.testing.assert_allclose(res.fittedvalues.to_numpy(), ref.fitted)
    np.testing.assert_allclose(res.resid.to_numpy(), ref.residuals)
    assert res.fittedvalues.index.equals(data.index)
    X = np.column_stack([np.ones(len(data)), data["age"], (data["sex"] == "M").astype(float)])
    np.testing.assert_allclose(res.predict().to_numpy(), X @ ref.fixef.to_numpy())
    new = data.iloc[[0, 500, 8999]]
    np.testing.assert_allclose(res.predict(new).to_numpy(), X[[0, 500, 8999]] @ ref.fixef.to_numpy())
    np.testing.assert_allclose(res.predict(exog=new, re_form=True).to_numpy(), ref.predict(new))
    assert list(res.predict(new).index) == [0, 500, 8999]


def test_random_effects_and_lmmfast_names(multi):
    res, ref = multi
    re = res.random_effects
    assert len(re) == sum(ref.ngroups.values())
    s = re[("classroom", "p01-s1-c1")]
    assert s["classroom"] == pytest.approx(ref.ranef["classroom"].loc["p01-s1-c1", "(Intercept)"])
    # lmmfast's names on the same object
    assert res.fixef is res.lmer_fit.fixef
    np.testing.assert_allclose(res.theta, ref.theta)
    assert res.varcorr.equals(res.lmer_fit.varcorr)
    assert set(res.ranef) == {"student_id", "classroom", "school", "province"}
    assert res.objective == pytest.approx(ref.objective)
    assert "fixef" in dir(res)
    with pytest.raises(AttributeError, match="no attribute"):
        res.not_an_attribute


def test_single_grouping_factor_statsmodels_layout(data):
    res = smf.mixedlm("test_score ~ age + sex", data, groups="classroom", re_formula="~age").fit()
    ref = reference(f"{FE} + (1 + age | classroom)", data)
    assert_same_fit(res, ref)
    assert list(res.params.index[3:]) == ["classroom Var", "classroom x age Cov", "classroom age Var"]
    S = ref.cov_re()[0][1]
    np.testing.assert_allclose(res.params.to_numpy()[3:], [S[0, 0], S[1, 0], S[1, 1]])
    cov = res.cov_re
    assert isinstance(cov, pd.DataFrame) and list(cov.index) == ["classroom", "age"]
    np.testing.assert_allclose(cov.to_numpy(), S)
    re = res.random_effects
    assert len(re) == 200 and list(re["p01-s1-c1"].index) == ["classroom", "age"]
    np.testing.assert_allclose(re["p01-s1-c1"].to_numpy(),
                               ref.ranef["classroom"].loc["p01-s1-c1"].to_numpy())
    text = str(res.summary())
    for key in ("No. Groups:", "Min. group size:", "Mean group size:", "classroom x age Cov",
                "Corr", "ICC adjusted", "Random slopes"):
        assert key in text


def test_summary_layout(multi):
    res, _ = multi
    s = res.summary()
    text = str(s)
    assert text == s.as_text()
    for key in ("Mixed Linear Model Regression Results", "Model:", "MixedLM", "Dependent Variable:",
                "test_score", "Method:", "REML", "Scale:", "Log-Likelihood:", "Converged:", "Coef.",
                "Std.Err.", "P>|z|", "[0.025", "0.975]", "sex[T.M]", "province Var",
                "Grouping factor", "Std.Dev.", "VPC", "ICC adjusted", "ICC conditional"):
        assert key in text, key
    ic = res.icc()
    assert f"{ic.adjusted:.3f}" in text
    assert len(s.tables) == 3


# ------------------------------------------------------------------------ dataset
def test_students_dataset(data):
    from lmmfast.datasets.students import TRUE_PARAMETERS, simulate_students

    assert data.shape == (9000, 7)
    assert list(data.columns) == ["test_score", "age", "sex", "classroom", "school", "province",
                                  "student_id"]
    assert data["province"].nunique() == 10 and data["school"].nunique() == 50
    assert data["classroom"].nunique() == 200 and data["student_id"].nunique() == 3000
    assert (data.groupby("student_id").size() == 3).all()
    # classroom labels are unique across schools: school:classroom = classroom
    assert data.groupby("classroom")["school"].nunique().max() == 1
    sim = simulate_students()
    pd.testing.assert_frame_equal(sim[["sex", "classroom", "school", "province", "student_id"]]
                                  .astype(object),
                                  data[["sex", "classroom", "school", "province", "student_id"]]
                                  .astype(object))
    np.testing.assert_allclose(sim[["test_score", "age"]].to_numpy(),
                               data[["test_score", "age"]].to_numpy(), atol=1e-9)
    assert TRUE_PARAMETERS["sd_residual"] == 6.0
    small = simulate_students(seed=1, n_provinces=2, n_schools=2, n_classrooms=2, n_students=3)
    assert small.shape == (72, 7)
    with pytest.raises(KeyError):
        simulate_students(params={"nope": 1})


def test_students_estimates_near_truth(multi):
    res, _ = multi
    assert res.fe_params["age"] == pytest.approx(2.5, abs=0.4)
    assert res.fe_params["sex[T.M]"] == pytest.approx(-1.5, abs=0.6)
    assert np.sqrt(res.scale) == pytest.approx(6.0, abs=0.3)
    assert np.sqrt(res.params["student_id Var"]) == pytest.approx(5.0, abs=0.5)
