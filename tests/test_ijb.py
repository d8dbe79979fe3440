"""IJB-B/C: reading the release layout, embedding aligned crops, and 1:1 / 1:N scores equal to the official loops.

The references below are straightforward loop implementations of arcface_torch `eval_ijbc.py`
(`image2template_feature`, `verification`, the TPR@FPR table) and InsightFace `ijb_1n.py`
(`gen_mask`, `evaluation`), written here from the protocol, run on the same inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from femb.data.align import ARCFACE_TEMPLATE, norm_crop
from femb.embed import embed_pixels
from femb.errors import FembError
from femb.evaluation.ijb import (
    FAR_TARGETS,
    embed_ijb,
    evaluate_1v1,
    evaluate_1vn,
    evaluate_ijb,
    pair_scores,
    read_ijb,
    subject_templates,
    template_features,
)
from femb.evaluation.verification import far_key
from tests.helpers import calibrated_tiny_mbf

# ------------------------------------------------------------------------------------ reference loops


def official_templates(feats, templates, medias, choose=None):
    """eval_ijbc.py `image2template_feature`: loops over templates and their medias."""
    unique = np.unique(templates if choose is None else choose)
    out = np.zeros((len(unique), feats.shape[1]))
    for count, uqt in enumerate(unique):
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        media_feats = []
        for u in np.unique(face_medias):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(np.mean(face_feats[ind_m], axis=0, keepdims=True))
        out[count] = np.sum(np.array(media_feats), axis=0)
    return unique, out / np.sqrt(np.sum(out**2, -1, keepdims=True))


def official_1v1(feats, faceness, templates, medias, p1, p2, labels, normalize=False, detector=True):
    if normalize:
        feats = feats / np.sqrt(np.sum(feats**2, -1, keepdims=True))
    if detector:
        feats = feats * faceness[:, np.newaxis]
    unique, tfeats = official_templates(feats, templates, medias)
    template2id = np.zeros((max(unique) + 1, 1), dtype=int)
    for count, uqt in enumerate(unique):
        template2id[uqt] = count
    score = np.zeros(len(p1))
    for start in range(0, len(p1), 1000):
        s = np.arange(start, min(start + 1000, len(p1)))
        score[s] = np.sum(tfeats[template2id[p1[s]]] * tfeats[template2id[p2[s]]], -1).flatten()
    fpr, tpr, _ = roc_curve(labels, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    table = {}
    for far in FAR_TARGETS:
        _, min_index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        table[far_key(far)] = tpr[min_index]
    return score, table


def official_1vn(query_feats, gallery_feats, query_ids, gallery_ids):
    mask = []
    for query_id in query_ids:
        pos = [i for i, x in enumerate(gallery_ids) if query_id == x]
        if len(pos) != 1:
            raise RuntimeError(f"RegIdsError with id = {query_id}")
        mask.append(pos[0])
    similarity = np.dot(query_feats, gallery_feats.T)
    top_inds = np.argsort(-similarity, kind="stable")
    q = len(query_feats)
    result = {}
    for k in (1, 5, 10):
        result[f"rank_{k}"] = sum(mask[i] in top_inds[i, :k] for i in range(q)) / q
    fars = [0.01, 0.1]
    required = [math.ceil(q * x) for x in fars]
    pos_sims = []
    for i in range(q):
        pos_sims.append(similarity[i, mask[i]])
        similarity[i, mask[i]] = -2.0
    pos_sims = np.array(pos_sims)
    neg = np.sort(similarity[np.where(similarity > -2.0)])[::-1]
    result["tpir_at_fpir"] = {far_key(f): np.sum(pos_sims > neg[k - 1]) / q for f, k in zip(fars, required)}
    return result


# ------------------------------------------------------------------------------------ random IJB-like data


def random_release(seed=0, subjects=30, dim=16):
    """Images grouped into medias and templates of subjects; pairs with repeats and reversed repeats (ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((subjects, dim))
    templates, medias, feats, template_subject = [], [], [], {}
    media_id = 0
    for t in range(1, 4 * subjects + 1):
        subject = int(rng.integers(subjects))
        template_subject[t * 7] = subject  # sparse, non-contiguous template ids
        for _ in range(int(rng.integers(1, 5))):
            media_id += 1
            for _ in range(int(rng.integers(1, 4))):
                templates.append(t * 7)
                medias.append(media_id)
                feats.append(centres[subject] + 0.8 * rng.standard_normal(dim))
    ids = np.array(sorted(template_subject))
    p1 = rng.choice(ids, 3000)
    p2 = rng.choice(ids, 3000)
    repeat = rng.integers(0, 3000, 400)
    p1 = np.r_[p1, p1[repeat[:200]], p2[repeat[200:]]]
    p2 = np.r_[p2, p2[repeat[:200]], p1[repeat[200:]]]
    labels = np.array([int(template_subject[a] == template_subject[b]) for a, b in zip(p1, p2)])
    order = rng.permutation(len(templates))
    return {
        "features": np.array(feats)[order],
        "faceness": rng.uniform(0.3, 1.0, len(templates))[order],
        "templates": np.array(templates)[order],
        "medias": np.array(medias)[order],
        "t1": p1,
        "t2": p2,
        "labels": labels,
        "subject_of": template_subject,
    }


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("detector", [True, False])
def test_1v1_equals_the_official_loops(normalize, detector):
    data = random_release(1)
    ours = evaluate_1v1(
        data["features"],
        data["faceness"],
        data["templates"],
        data["medias"],
        data["t1"],
        data["t2"],
        data["labels"],
        normalize_images=normalize,
        use_faceness=detector,
    )
    scores, table = official_1v1(
        data["features"],
        data["faceness"],
        data["templates"],
        data["medias"],
        data["t1"],
        data["t2"],
        data["labels"],
        normalize,
        detector,
    )
    np.testing.assert_allclose(ours["scores"], scores, rtol=0, atol=1e-12)
    assert ours["tar_at_far"] == table
    assert ours["pairs"] == 3400 and ours["genuine"] == int(data["labels"].sum())


def test_repeated_and_reversed_pairs_score_bit_identically():
    data = random_release(2)
    scores = evaluate_1v1(
        data["features"],
        data["faceness"],
        data["templates"],
        data["medias"],
        data["t1"],
        data["t2"],
        data["labels"],
    )["scores"]
    assert len(np.unique(scores)) < len(scores) - 350  # at least the 400 repeats tie with their originals
    key = {}
    for a, b, s in zip(data["t1"], data["t2"], scores):
        assert key.setdefault((min(a, b), max(a, b)), s) == s


def test_float32_features_match_the_official_float32_loop_to_float32_rounding():
    data = random_release(3)
    args = (data["templates"], data["medias"], data["t1"], data["t2"], data["labels"])
    feats, face = data["features"].astype(np.float32), data["faceness"].astype(np.float32)
    ours = evaluate_1v1(feats, face, *args)["scores"]
    official, _ = official_1v1(feats, face, *args)
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-6)


def test_interpolated_tar_lies_on_the_roc_and_auc_is_sklearns():
    from sklearn.metrics import roc_auc_score

    data = random_release(4)
    out = evaluate_1v1(
        data["features"],
        data["faceness"],
        data["templates"],
        data["medias"],
        data["t1"],
        data["t2"],
        data["labels"],
    )
    assert out["auc"] == pytest.approx(roc_auc_score(data["labels"], out["scores"]), abs=1e-12)
    fpr, tpr = out["fpr"], out["tpr"]
    for far in FAR_TARGETS:
        value = out["tar_at_far_interpolated"][far_key(far)]
        below = tpr[fpr <= far].max() if (fpr <= far).any() else 0.0
        above = tpr[fpr >= far].min()
        assert below <= value <= max(above, below)
        threshold = out["threshold_at_far"][far_key(far)]
        if threshold is not None:  # the official point accepts exactly the scores >= its threshold
            accepted = out["scores"] >= threshold
            negatives, positives = data["labels"] == 0, data["labels"] == 1
            assert (accepted & negatives).sum() / negatives.sum() in fpr
            assert (accepted & positives).sum() / positives.sum() == out["tar_at_far"][far_key(far)]


def test_the_roc_is_sklearns_on_the_scores_in_pair_order_bit_for_bit_with_ties():
    data = random_release(6)
    features = np.round(data["features"], 1)  # coarse features: many pairs score exactly alike
    args = (features, data["faceness"], data["templates"], data["medias"], data["t1"], data["t2"])
    out = evaluate_1v1(*args, data["labels"], use_faceness=False)
    assert len(np.unique(out["scores"])) < len(out["scores"])
    for got, expected in zip(
        (out["fpr"], out["tpr"], out["thresholds"]), roc_curve(data["labels"], out["scores"])
    ):
        assert np.array_equal(got, expected)


def test_1vn_equals_the_official_loops():
    data = random_release(5, subjects=40, dim=12)
    subject_of = data["subject_of"]
    ids = np.array(sorted(subject_of))
    first_of_subject = {}
    for t in ids:
        first_of_subject.setdefault(subject_of[t], t)
    gallery_ids = np.array(sorted(first_of_subject.values()))
    probe_ids = np.array([t for t in ids if t not in set(gallery_ids)])
    rows = np.r_[gallery_ids, gallery_ids[:5]]  # repeated rows, as the csv files hold one per image
    g_t, g_s = subject_templates(rows, [subject_of[t] for t in rows])
    p_t, p_s = subject_templates(probe_ids, [subject_of[t] for t in probe_ids])
    feats = data["features"] * data["faceness"][:, None]
    _, g_f = template_features(feats, None, data["templates"], data["medias"], use_faceness=False, choose=g_t)
    _, p_f = template_features(feats, None, data["templates"], data["medias"], use_faceness=False, choose=p_t)
    ours = evaluate_1vn(g_f, g_s, p_f, p_s)
    _, g_ref = official_templates(feats, data["templates"], data["medias"], g_t)
    _, p_ref = official_templates(feats, data["templates"], data["medias"], p_t)
    np.testing.assert_allclose(g_f, g_ref, atol=1e-12)
    reference = official_1vn(p_ref, g_ref, p_s, g_s)
    for k in (1, 5, 10):
        assert ours[f"rank_{k}"] == reference[f"rank_{k}"]
    assert ours["tpir_at_fpir"] == reference["tpir_at_fpir"]
    assert 0 < ours["rank_1"] < ours["rank_10"] <= 1
    assert ours["probes"] == len(p_t) and ours["gallery"] == len(g_t)


def test_1vn_refuses_a_probe_subject_without_exactly_one_gallery_template():
    g = np.eye(3)
    with pytest.raises(FembError, match="probe subject 9 has 0 gallery templates"):
        evaluate_1vn(g, [1, 2, 3], g, [1, 9, 3])
    with pytest.raises(FembError, match="probe subject 2 has 2 gallery templates"):
        evaluate_1vn(g, [1, 2, 2], g[:2], [1, 2])


# ------------------------------------------------------------------------------------ a tiny release on disk


def crop(seed):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (15, 15, 3), dtype=np.uint8)
    return cv2.resize(coarse, (112, 112), interpolation=cv2.INTER_CUBIC)


def write_release(root: Path, name="ijbc", images=6, one_n=True, shuffle=False):
    """Crops warped into 320 x 300 canvases by known similarities; landmarks are the template's images."""
    (root / "loose_crop").mkdir(parents=True)
    meta = root / "meta"
    meta.mkdir()
    pts, tid = [], []
    for i in range(images):
        angle, scale = 0.3 * (i - 2), 1.2 + 0.1 * i
        matrix = cv2.getRotationMatrix2D((56, 56), np.degrees(angle), scale)
        matrix[:, 2] += (40 + 3 * i, 30 + 2 * i)
        canvas = cv2.warpAffine(crop(i), matrix, (320, 300), flags=cv2.INTER_CUBIC)
        cv2.imwrite(
            str(root / "loose_crop" / f"{i + 1}.jpg"), canvas[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 98]
        )
        points = ARCFACE_TEMPLATE.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
        pts.append(f"{i + 1}.jpg " + " ".join(f"{v:.4f}" for v in points.ravel()) + f" {0.5 + 0.08 * i:.3f}")
        tid.append(f"{i + 1}.jpg {i // 2 + 1} {i + 1 if i % 3 else 100 + i // 2}")
    if shuffle:
        tid = tid[::-1]
    (meta / f"{name}_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    (meta / f"{name}_face_tid_mid.txt").write_text("\n".join(tid) + "\n")
    (meta / f"{name}_template_pair_label.txt").write_text("1 2 0\n1 3 0\n2 3 0\n1 1 1\n3 3 1\n")
    if one_n:
        g1, g2 = ("G1", "G2") if name.upper() == "IJBC" else ("S1", "S2")
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
        (meta / f"{name}_1N_gallery_{g1}.csv").write_text(header + "1,10,a.jpg\n1,10,b.jpg\n")
        (meta / f"{name}_1N_gallery_{g2}.csv").write_text(header + "2,20,c.jpg\n")
        (meta / f"{name}_1N_probe_mixed.csv").write_text(header + "3,20,d.jpg\n")
    return root


def test_read_ijb_reads_the_release(tmp_path):
    data = read_ijb(write_release(tmp_path / "r"))
    assert data.name == "IJBC" and data.images[0] == "1.jpg" and len(data.images) == 6
    assert data.landmarks.shape == (6, 5, 2) and data.landmarks.dtype == np.float32
    np.testing.assert_allclose(data.faceness, 0.5 + 0.08 * np.arange(6), atol=1e-6)
    assert data.templates.tolist() == [1, 1, 2, 2, 3, 3]
    assert data.pair_t1.tolist() == [1, 1, 2, 1, 3] and data.pair_labels.tolist() == [0, 0, 0, 1, 1]
    assert data.gallery_templates.tolist() == [1, 1, 2] and data.gallery_subjects.tolist() == [10, 10, 20]
    assert data.probe_templates.tolist() == [3] and data.has_1vn


def test_read_ijb_without_1n_files_and_ijbb_names(tmp_path):
    data = read_ijb(write_release(tmp_path / "b", name="ijbb", one_n=True))
    assert data.name == "IJBB" and data.has_1vn
    assert not read_ijb(write_release(tmp_path / "c", one_n=False)).has_1vn


def test_rows_are_matched_by_image_name_not_order(tmp_path):
    a = read_ijb(write_release(tmp_path / "a"))
    b = read_ijb(write_release(tmp_path / "b", shuffle=True))
    assert a.images == b.images
    np.testing.assert_array_equal(a.templates, b.templates)
    np.testing.assert_array_equal(a.medias, b.medias)
    feats = np.random.default_rng(0).standard_normal((6, 8))
    assert evaluate_ijb(a, feats) == evaluate_ijb(b, feats)


def edit(path: Path, line: int, text: str | None) -> None:
    lines = path.read_text().splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


BAD = [
    ("ijbc_face_tid_mid.txt", 0, None, r"ijbc_face_tid_mid.txt: no such file"),
    ("ijbc_name_5pts_score.txt", 3, "3.jpg 1 2 3", r"ijbc_name_5pts_score.txt:3: expected .* found 4"),
    (
        "ijbc_name_5pts_score.txt",
        2,
        "2.jpg 1 2 3 4 5 6 7 x 9 10 0.9",
        r"_5pts_score.txt:2: 'x' is not a finite",
    ),
    ("ijbc_name_5pts_score.txt", 2, "2.jpg 1 2 3 4 5 6 7 nan 9 10 0.9", r"_5pts_score.txt:2: 'nan' is not"),
    ("ijbc_face_tid_mid.txt", 4, "4.jpg 2", r"ijbc_face_tid_mid.txt:4: expected .* found 2"),
    ("ijbc_face_tid_mid.txt", 4, "4.jpg 2 m", r"ijbc_face_tid_mid.txt:4: 'm' is not a whole number"),
    (
        "ijbc_face_tid_mid.txt",
        5,
        None,
        r"ijbc_name_5pts_score.txt:5: image 5.jpg has no row in ijbc_face_tid_mid",
    ),
    ("ijbc_face_tid_mid.txt", 5, "7.jpg 3 5", r"ijbc_name_5pts_score.txt:5: image 5.jpg has no row"),
    ("ijbc_face_tid_mid.txt", 6, "5.jpg 3 5", r"ijbc_face_tid_mid.txt:6: image 5.jpg is listed twice"),
    (
        "ijbc_template_pair_label.txt",
        3,
        "2 3",
        r"ijbc_template_pair_label.txt:3: expected 't1 t2 label' .* found 2",
    ),
    ("ijbc_template_pair_label.txt", 2, "1 x 0", r"ijbc_template_pair_label.txt:2: '1 x 0' is not 3 whole"),
    ("ijbc_template_pair_label.txt", 4, "1 9 1", r"ijbc_template_pair_label.txt:4: template 9 has no image"),
    ("ijbc_template_pair_label.txt", 5, "3 3 2", r"ijbc_template_pair_label.txt:5: label 2 is not 0 or 1"),
    ("ijbc_1N_probe_mixed.csv", 2, "8,20,d.jpg", r"ijbc_1N_probe_mixed.csv:2: template 8 has no image"),
    ("ijbc_1N_gallery_G2.csv", 2, "2", r"ijbc_1N_gallery_G2.csv:2: expected 'template,subject"),
    ("ijbc_1N_gallery_G1.csv", 3, "1,ten,b.jpg", r"ijbc_1N_gallery_G1.csv:3: template and subject ids"),
]


@pytest.mark.parametrize(("file", "line", "text", "message"), BAD, ids=[b[3][:40] for b in BAD])
def test_bad_meta_rows_are_one_error_naming_file_and_line(tmp_path, file, line, text, message):
    root = write_release(tmp_path / "r")
    path = root / "meta" / file
    if line == 0:
        path.unlink()
    else:
        edit(path, line, text)
    with pytest.raises(FembError, match=message) as err:
        read_ijb(root)
    assert "\n" not in str(err.value)


def test_an_image_missing_from_loose_crop_names_its_meta_line(tmp_path):
    root = write_release(tmp_path / "r")
    (root / "loose_crop" / "4.jpg").unlink()
    with pytest.raises(FembError, match=r"ijbc_name_5pts_score.txt:4: image 4.jpg is not in"):
        read_ijb(root)


def test_the_pair_file_parser_reads_many_lines_in_pieces(tmp_path, monkeypatch):
    import femb.evaluation.ijb as ijb

    monkeypatch.setattr(ijb, "_PAIR_CHUNK_BYTES", 64)  # many pieces, cut at line ends
    root = write_release(tmp_path / "r")
    rng = np.random.default_rng(0)
    pairs = np.c_[rng.integers(1, 4, (500, 2)), rng.integers(0, 2, 500)]
    text = "".join(
        f"{a} {b} {c}\n" if i % 50 else f"{a}\t{b}  {c}\r\n\n" for i, (a, b, c) in enumerate(pairs)
    )
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(text)
    data = read_ijb(root)
    np.testing.assert_array_equal(np.c_[data.pair_t1, data.pair_t2, data.pair_labels], pairs)
    lines = text.splitlines()
    lines[437] = "1 2 3 4"
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(lines))
    with pytest.raises(FembError, match=r"pair_label.txt:438: expected 't1 t2 label' \(3 fields\), found 4"):
        read_ijb(root)


# ------------------------------------------------------------------------------------ embedding


def test_embed_ijb_aligns_flip_sums_and_caches(tmp_path, monkeypatch):
    data = read_ijb(write_release(tmp_path / "r"))
    aligned = [
        norm_crop(cv2.imread(str(p))[:, :, ::-1].copy(), lm)
        for p, lm in zip(data.image_paths(), data.landmarks)
    ]
    for i, pixels in enumerate(aligned):  # the known similarity is undone: the crop comes back
        assert np.abs(pixels[8:-8, 8:-8].astype(float) - crop(i)[8:-8, 8:-8]).mean() < 4
    model = calibrated_tiny_mbf()
    features = embed_ijb(model, data, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    expected = embed_pixels(model, torch.from_numpy(np.stack(aligned)).permute(0, 3, 1, 2), flip=True)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert features.dtype == np.float32 and len(list((tmp_path / "cache").glob("ijbc-*.npy"))) == 1

    import femb.evaluation.ijb as ijb

    monkeypatch.setattr(ijb, "embed_batches", lambda *a, **k: pytest.fail("re-embedded despite the cache"))
    again = embed_ijb(model, data, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again, features)
    metrics = evaluate_ijb(data, features)
    assert set(metrics) == {"name", "1v1", "1vn"} and set(metrics["1vn"]["tpir_at_fpir"]) == {
        "1e-02",
        "1e-01",
    }


def test_pair_scores_equal_explicit_dot_products_on_dense_and_sparse_blocks():
    rng = np.random.default_rng(5)
    ids = np.sort(rng.choice(10_000, 1500, replace=False)) + 7  # sparse, unordered-looking template ids
    feats = rng.standard_normal((1500, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    dense = rng.integers(0, 1500, (20_000, 2))  # rows of the first blocks pair with most columns
    sparse = np.stack([rng.integers(1024, 1500, 50), rng.integers(0, 1500, 50)], 1)  # a few partners
    index = np.concatenate([dense, sparse])
    scores = pair_scores(ids, feats, ids[index[:, 0]], ids[index[:, 1]])
    expected = np.einsum("ij,ij->i", feats[index[:, 0]], feats[index[:, 1]])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    with pytest.raises(FembError, match="t2: pair 1 names template 3, which has no image"):
        pair_scores(ids, feats, ids[:2], np.array([ids[0], 3]))
