# ruff: noqa: RUF001 (Chinese text keeps its own full-width punctuation)
"""Fifty factory questions, each with the JSON Schema its answer must fit: what line equipment,
MES connectors and PLC gateways ask for. Used by tests/test_structured_prompts.py (every
constrained answer must parse and fit) and by scripts/bench.py's structured section (the same
questions with and without the constraint, counted).

The schemas use only what the decoding grammar holds an answer to (types, enums, required,
additionalProperties, maxLength, maxItems): a bound on every string and list keeps each
answer within MAX_TOKENS.
"""

from __future__ import annotations

from typing import Any

MAX_TOKENS = 256


def _obj(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _text(n: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


ALARM = _obj({
    "severity": {"enum": ["info", "check", "stop_line"]},
    "cause": _text(80),
    "next_check": _text(80),
})  # fmt: skip
CHECKLIST = _obj({
    "task": _text(60),
    "steps": {"type": "array", "items": _text(50), "minItems": 2, "maxItems": 5},
})  # fmt: skip
YES_NO = _obj({"answer": {"enum": ["yes", "no"]}, "reason": _text(100)})
READING = _obj({
    "quantity": _text(30),
    "value": {"type": "number"},
    "unit": _text(12),
})  # fmt: skip
EXTRACTION = _obj({"readings": {"type": "array", "items": READING, "minItems": 1, "maxItems": 4}})
CHINESE = _obj({
    "summary": _text(40),
    "action": _text(40),
    "urgent": {"type": "boolean"},
})  # fmt: skip

ALARMS = [
    "Filler 3 shows alarm F17: low air pressure at the capper.",
    "Press 4 stopped with E042: hydraulic oil temperature 78 C, limit 70 C.",
    "Conveyor 2 reports a motor overload trip on drive M2 after a jam at the transfer.",
    "Labeller 1: label web break detected, roll at 12% remaining.",
    "Oven zone 3 thermocouple reads 0 C while zones 2 and 4 read 215 C.",
    "Palletizer safety light curtain interrupted, no person visible on camera.",
    "Chiller outlet water at 14 C, setpoint 7 C, compressor running.",
    "Robot cell 5: gripper vacuum not reached within 2 s on pick, three times in a row.",
    "Mixer 1 torque at 95% of rated for 10 minutes with a normal batch recipe.",
    "Compressed air dew point rose from 3 C to 12 C over the last hour.",
]
CHECKLISTS = [
    "List the steps to clear a jam at the bottle infeed star wheel.",
    "What should an operator check before starting the filler after a weekend stop?",
    "Give the steps for a lockout-tagout on conveyor 2 before replacing a belt.",
    "Steps to change the label roll on labeller 1.",
    "How do I calibrate the checkweigher with the test weights?",
    "List the shift handover checks for the packaging line.",
    "Steps to restart the palletizer after an emergency stop.",
    "What to inspect on a pneumatic cylinder that moves slowly?",
    "Give the daily cleaning steps for the capper heads.",
    "Steps to replace a blown fuse in the control cabinet safely.",
]
YES_NOS = [
    "Can the filler run at full speed with one capper head out of service?",
    "Is it safe to open the oven door while zone 3 is above 200 C?",
    "Should a motor that trips on overload twice in an hour be reset a third time?",
    "Is a vibration of 12 mm/s on a pump bearing acceptable for continuous running?",
    "May an operator bypass the light curtain to clear a pallet jam?",
    "Is compressed air at 4.5 bar enough for cylinders rated at 6 bar?",
    "Should the line stop if the metal detector fails its hourly test?",
    "Can food-grade grease be replaced by standard grease on the filler valves?",
    "Is a hydraulic oil temperature of 78 C a reason to stop the press?",
    "Does a label web break require the labeller to be stopped?",
]
NOTES = [
    "Shift note: press 4 ran at 42 strokes per minute, oil temp peaked at 71 C, one stop of 5 min.",
    "Night shift: oven zone 2 held 212 C, conveyor speed 3.5 m/min, reject rate 1.8 %.",
    "Chiller log: inlet 12.4 C, outlet 7.1 C, flow 36 m3/h.",
    "Filler 3 made 18,500 bottles, air pressure dipped to 4.8 bar twice, fill weight 502 g.",
    "Compressor 2: 7.2 bar delivery, 65 C discharge temperature, 1,240 running hours.",
    "Mixer 1 batch 77: 450 kg flour, 12 minutes mixing, dough temperature 26 C.",
    "Boiler at 9.5 bar steam, feed water 85 C, stack temperature 190 C.",
    "Line 2 OEE 71 %, speed 120 packs/min, 3 micro-stops of under 1 min.",
    "Checkweigher: mean 250.4 g, 14 rejects in 2,000 packs, belt speed 0.8 m/s.",
    "Cooling tower fan 18.5 kW drawing 31 A, basin water 27 C.",
]
CHINESE_NOTES = [
    "灌装机3号报警F17：封盖机气压低。",
    "冲压机4号液压油温度78度，超过70度上限。",
    "2号输送带电机过载跳闸，转运处有卡料。",
    "贴标机1号标签纸断裂，剩余12%。",
    "烤炉3区热电偶显示0度，2区和4区显示215度。",
    "码垛机安全光幕被遮挡，摄像头未看到人员。",
    "冷水机出水温度14度，设定值7度。",
    "5号机器人夹爪真空2秒内未建立，连续三次。",
    "搅拌机1号扭矩十分钟内保持在额定值的95%。",
    "压缩空气露点在一小时内从3度升到12度。",
]

PROMPTS: list[tuple[str, str, dict[str, Any]]] = [
    *[("alarm", f"{a} Classify the alarm: severity, likely cause, next check.", ALARM)
      for a in ALARMS],
    *[("checklist", q, CHECKLIST) for q in CHECKLISTS],
    *[("yes/no", f"{q} Answer yes or no with a short reason.", YES_NO) for q in YES_NOS],
    *[("extraction", f"Extract every reading (quantity, value, unit) from this note: {n}",
       EXTRACTION) for n in NOTES],
    *[("chinese", f"用中文总结这条报警，给出处理措施，并判断是否紧急：{n}", CHINESE)
      for n in CHINESE_NOTES],
]  # fmt: skip
assert len(PROMPTS) == 50


def has_cjk(value: Any) -> bool:
    """Whether any string in a JSON value holds a CJK ideograph."""
    if isinstance(value, str):
        return any("\u4e00" <= ch <= "\u9fff" for ch in value)
    if isinstance(value, dict):
        return any(has_cjk(v) for v in value.values())
    if isinstance(value, list):
        return any(has_cjk(v) for v in value)
    return False
