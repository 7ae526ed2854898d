"""Short clinical vignettes in English and Chinese: six conditions, one case per language each.

Used to check that real embeddings rank clinically similar cases above dissimilar ones.  The
multilingual e5-small model clusters by language first (any English case is nearer an English
query than any Chinese case), so the tests compare within a language, and across languages
only among the other language's cases.
"""

from __future__ import annotations

from typing import Any

# (id, condition, language, department, ICD-10, text)
# fmt: off
VIGNETTES: list[tuple[str, str, str, str, str, str]] = [
    (
        "v-mi-en", "mi", "en", "Cardiology", "I21.1",
        "58-year-old man with crushing substernal chest pain radiating to the left arm for 2 "
        "hours, diaphoresis. ECG: ST elevation in II, III, aVF. Troponin I elevated. Diagnosis: "
        "acute inferior STEMI, emergency PCI of the right coronary artery.",
    ),
    (
        "v-mi-zh", "mi", "zh", "Cardiology", "I21.0",
        "男性，62岁，突发胸骨后压榨性疼痛3小时，向左肩放射，伴大汗。心电图示V1-V4导联ST段抬高，"
        "肌钙蛋白升高。诊断：急性前壁ST段抬高型心肌梗死，行急诊冠脉介入治疗。",
    ),
    (
        "v-pna-en", "pneumonia", "en", "Pediatrics", "J18.1",
        "4-year-old girl with fever 39.5C, productive cough and tachypnea for 3 days. Crackles "
        "over the right lower lobe; chest X-ray shows right lower lobe consolidation. Diagnosis: "
        "community-acquired pneumonia, started on amoxicillin.",
    ),
    (
        "v-pna-zh", "pneumonia", "zh", "Pediatrics", "J18.9",
        "患儿，5岁，发热3天，体温最高39.8℃，咳嗽咳痰，呼吸急促。右下肺可闻及湿啰音，胸片示右下肺"
        "实变。诊断：社区获得性肺炎，予阿莫西林抗感染治疗。",
    ),
    (
        "v-hip-en", "hip", "en", "Orthopedics", "S72.0",
        "79-year-old woman fell at home, unable to bear weight, left leg shortened and externally "
        "rotated. X-ray: displaced left femoral neck fracture. Treated with hemiarthroplasty.",
    ),
    (
        "v-hip-zh", "hip", "zh", "Orthopedics", "S72.0",
        "女性，81岁，在家中跌倒后左髋疼痛、不能站立，左下肢短缩外旋。X线示左股骨颈骨折（移位）。"
        "行左髋关节置换术。",
    ),
    (
        "v-dka-en", "dka", "en", "Endocrinology", "E10.1",
        "19-year-old with type 1 diabetes presenting with vomiting, abdominal pain and Kussmaul "
        "breathing. Glucose 32 mmol/L, pH 7.05, ketones high. Diagnosis: diabetic ketoacidosis, "
        "IV insulin and fluids.",
    ),
    (
        "v-dka-zh", "dka", "zh", "Endocrinology", "E10.1",
        "患者，20岁，1型糖尿病史，恶心呕吐、腹痛1天，深大呼吸。血糖30 mmol/L，血pH 7.08，血酮体"
        "明显升高。诊断：糖尿病酮症酸中毒，予静脉胰岛素及补液治疗。",
    ),
    (
        "v-stroke-en", "stroke", "en", "Neurology", "I63.5",
        "70-year-old man with sudden right-sided weakness and expressive aphasia, onset 1 hour "
        "ago. CT negative for bleed; CTA shows left MCA occlusion. Acute ischemic stroke, "
        "thrombolysis with alteplase.",
    ),
    (
        "v-stroke-zh", "stroke", "zh", "Neurology", "I63.5",
        "男，72岁，突发右侧肢体无力伴言语不清1小时。头颅CT未见出血，CTA示左侧大脑中动脉闭塞。"
        "诊断：急性缺血性脑卒中，予阿替普酶静脉溶栓。",
    ),
    (
        "v-appy-en", "appendicitis", "en", "Surgery", "K35.8",
        "24-year-old with periumbilical pain migrating to the right lower quadrant, fever, "
        "McBurney tenderness, leukocytosis. CT: inflamed appendix. Laparoscopic appendectomy.",
    ),
    (
        "v-appy-zh", "appendicitis", "zh", "Surgery", "K35.8",
        "患者，女，26岁，转移性右下腹痛12小时，伴发热，麦氏点压痛反跳痛，白细胞升高。CT示阑尾"
        "增粗。行腹腔镜阑尾切除术。",
    ),
]
# fmt: on

# (query text, condition, language)
QUERIES: list[tuple[str, str, str]] = [
    ("chest pain with ST elevation, heart attack", "mi", "en"),
    ("急性心肌梗死", "mi", "zh"),
    ("child with fever, cough and lung consolidation", "pneumonia", "en"),
    ("小儿肺炎", "pneumonia", "zh"),
    ("elderly hip fracture after a fall", "hip", "en"),
    ("髋部骨折", "hip", "zh"),
    ("diabetic ketoacidosis", "dka", "en"),
    ("糖尿病酮症酸中毒", "dka", "zh"),
    ("sudden hemiparesis and aphasia", "stroke", "en"),
    ("脑梗死 溶栓", "stroke", "zh"),
    ("right lower quadrant pain, appendicitis", "appendicitis", "en"),
    ("阑尾炎", "appendicitis", "zh"),
]

CONDITION = {v[0]: v[1] for v in VIGNETTES}
LANGUAGE = {v[0]: v[2] for v in VIGNETTES}

# Substrings that must never appear in a server log (case text and query text).
SECRET_FRAGMENTS = ("crushing substernal", "压榨性疼痛", "Kussmaul", "阿替普酶", "小儿肺炎")


def vignette_cases() -> list[dict[str, Any]]:
    return [
        {"id": vid, "text": text, "department": dept, "icd10": [icd]}
        for vid, _, _, dept, icd, text in VIGNETTES
    ]
