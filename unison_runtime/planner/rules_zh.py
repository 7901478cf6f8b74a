"""Chinese (and mixed) instructions, rewritten into the English cue words the rule planner reads.

The rule planner's conventions are written once, in English (:mod:`.rules`, :mod:`.rules_meta`).
Rather than a second set of regexes, each Chinese cue is replaced by its English counterpart,
padded with spaces: ``生成一段5秒的竖屏视频`` is read as ``generate 一段 5 seconds 的 vertical format
video``. Only the planner's reading changes; the prompt umT5 sees is the user's own text.

Numbers come first (``五秒`` -> ``5 seconds``, ``每秒24帧`` -> ``24 fps``, ``1分30秒`` -> ``90 seconds``),
then the phrase table, longest phrase first so ``深度图`` wins over ``图``. Pure Python, compiled
once at import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from .rules_cues import Cue

#: Stands for a Chinese question word: it makes its sentence a question wherever it stands (Chinese
#: questions rarely start with the question word, and often end without a question mark).
QUESTION_MARK = "\ue001"

# --------------------------------------------------------------------------- numerals

_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10000}
_CN_NUMERAL = "[零〇一二两三四五六七八九十百千万]"
#: A number as people write it before a unit: 5, 1.5, 五, 十五, 一百二十, 三点五, 两个半, 半.
NUMBER_ZH = rf"(?:\d+(?:\.\d+)?|{_CN_NUMERAL}+(?:点{_CN_NUMERAL}+)?)"


def chinese_integer(text: str) -> int:
    """一百二十 -> 120, 十五 -> 15, 两千 -> 2000, 二零二四 -> 2024 (digit by digit when no unit)."""
    if not any(c in _UNITS for c in text):
        value = 0
        for c in text:
            value = value * 10 + _DIGITS[c]
        return value
    total, section, digit = 0, 0, 0
    for c in text:
        if c in _DIGITS:
            digit = _DIGITS[c]
        elif c == "万":
            total += (section + digit) * 10000
            section = digit = 0
        else:
            section += (digit or 1) * _UNITS[c]
            digit = 0
    return total + section + digit


def parse_number_zh(text: str) -> Fraction:
    """Arabic digits or Chinese numerals, with 点 as the decimal point and 半 as one half."""
    half = Fraction(1, 2) if text.endswith("半") else Fraction(0)
    text = text.removesuffix("半").removesuffix("个")
    if not text:
        return half
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return Fraction(text) + half
    whole, _, fraction = text.partition("点")
    value = Fraction(chinese_integer(whole)) if whole else Fraction(0)
    if fraction:
        value += Fraction(chinese_integer(fraction), 10 ** len(fraction))
    return value + half


def _fmt(value: Fraction) -> str:
    """A plain decimal the English number regexes read (at most 6 places)."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


_NUM = rf"({NUMBER_ZH}(?:个?半)?|半)"
# Order matters: frame rates and "1分30秒" before plain seconds, seconds before the phrase table.
_NUMBER_RULES: tuple[tuple[Cue, Callable[[re.Match[str]], str]], ...] = (
    (Cue(rf"每秒(?:钟)?\s*{_NUM}\s*帧", "每秒"), lambda m: f" {_fmt(parse_number_zh(m[1]))} fps "),
    (Cue(rf"{_NUM}\s*帧\s*(?:每秒|/\s*秒|/\s*s\b)", "帧"), lambda m: f" {_fmt(parse_number_zh(m[1]))} fps "),
    (Cue(rf"帧率\s*(?:为|是|设为|设置为|:|：|=)?\s*{_NUM}\s*(?:帧|fps)?", "帧率"),
     lambda m: f" {_fmt(parse_number_zh(m[1]))} fps "),
    (Cue(rf"{_NUM}\s*分(?:钟)?\s*{_NUM}\s*秒(?:钟)?", "分"),
     lambda m: f" {_fmt(parse_number_zh(m[1]) * 60 + parse_number_zh(m[2]))} seconds "),
    (Cue(rf"{_NUM}\s*(?:个)?\s*(?:小时|钟头)", "小时 钟头"), lambda m: f" {_fmt(parse_number_zh(m[1]))} hours "),
    (Cue(rf"{_NUM}\s*分钟", "分钟"), lambda m: f" {_fmt(parse_number_zh(m[1]))} minutes "),
    (Cue(rf"{_NUM}\s*毫秒", "毫秒"), lambda m: f" {_fmt(parse_number_zh(m[1]))} ms "),
    (Cue(rf"{_NUM}\s*秒半", "秒半"), lambda m: f" {_fmt(parse_number_zh(m[1]) + Fraction(1, 2))} seconds "),
    (Cue(rf"{_NUM}\s*分半(?:钟)?", "分半"), lambda m: f" {_fmt(parse_number_zh(m[1]) * 60 + 30)} seconds "),
    (Cue(rf"{_NUM}\s*秒(?:钟)?", "秒"), lambda m: f" {_fmt(parse_number_zh(m[1]))} seconds "),
    (Cue(rf"{_NUM}\s*帧", "帧"), lambda m: f" {_fmt(parse_number_zh(m[1]))} frames "),
    (Cue(r"(\d+)\s*(?:比|:|：)\s*(\d+)", "比 : ：", digit=True), lambda m: f" {m[1]}:{m[2]} "),
    (Cue(r"(\d+)\s*[乘×xX*]\s*(\d+)", "乘 × x X *", digit=True), lambda m: f" {m[1]}x{m[2]} "),
    (Cue(r"(?:宽度|宽)\s*(?:为|是|设为|:|：|=)?\s*(-?\d+)", "宽", digit=True), lambda m: f" width {m[1]} "),
    (Cue(r"(?:高度|高)\s*(?:为|是|设为|:|：|=)?\s*(-?\d+)", "高", digit=True), lambda m: f" height {m[1]} "),
    # "图片中的女孩", "照片里的人": the subject shown in a given image (a reference cue), in the phrase table's words.
    (Cue(r"(?:图片|照片|图像|相片|图|画面|画)\s*(?:中|里|上)\s*的?\s*(这个人|人物|人|女人|男人|女孩|男孩|女士|男士|小孩"
         r"|孩子|角色|产品|商品|狗|猫|宠物)", "中 里 上"),
     lambda m: f" the {PHRASES.get(m[1], ' person ').split()[-1]} in the image "),
)  # fmt: skip

# --------------------------------------------------------------------------- phrases

#: Chinese phrase -> the English cue it stands for. Longest phrases win (see _PHRASE).
PHRASES: dict[str, str] = {
    # punctuation: full-width forms end sentences and separate ratios as in English
    "。": ". ", "！": "! ", "？": "? ", "；": "; ", "，": ", ", "、": ", ", "：": ": ", "（": " (", "）": ") ",
    "“": ' "', "”": '" ', "　": " ",
    # questions and requests for text
    "为什么": " why \ue001 ", "为何": " why \ue001 ", "什么": " what \ue001 ", "怎么样": " how \ue001 ",
    "怎么": " how \ue001 ", "怎样": " how \ue001 ", "如何": " how \ue001 ", "哪个": " which \ue001 ",
    "哪些": " which \ue001 ", "哪里": " where \ue001 ", "哪儿": " where \ue001 ", "哪": " which \ue001 ",
    "谁": " who \ue001 ", "多少": " how many \ue001 ", "几个": " how many \ue001 ", "几只": " how many \ue001 ",
    "几辆": " how many \ue001 ", "几人": " how many \ue001 ", "是否": " whether \ue001 ", "哪吒": " nezha ",
    "为什么不": " why \ue001 ", "干什么": " what \ue001 ", "有没有": " is there \ue001 ",
    "等于几": " equals what \ue001 ", "等于多少": " equals what \ue001 ", "几点": " what time \ue001 ",
    "几岁": " how old \ue001 ", "画家": " painter ", "画廊": " gallery ", "漫画": " comic ",
    "吗": " ? ", "呢": " ? ", "请问": " ? ", "描述": " describe ",
    "描写": " describe ", "解释": " explain ", "说明": " explain ", "讲解": " explain ", "总结": " summarize ",
    "概括": " summarize ", "归纳": " summarize ", "翻译": " translate ", "识别": " identify ", "辨认": " identify ",
    "分析": " analyze ", "数一数": " count ", "数数": " count ", "统计": " count ", "计算": " calculate ",
    "告诉我": " tell me ", "回答": " answer ", "比较": " compare ", "对比": " compare ", "介绍": " describe ",
    "判断": " determine ", "列出": " list ", "读出": " read ", "朗读": " read ", "写一": " write a ",
    "写出": " write ", "写个": " write a ", "提取": " read ", "讲讲": " tell me ", "看看": " describe ",
    "文案": " text ", "标题": " title ", "诗": " poem ", "故事": " story ",
    # generation verbs
    "生成的": " generated ", "制作的": " made ", "创作的": " created ", "绘制的": " drawn ", "拍摄的": " filmed ",
    "生成": " generate ", "创建": " create ", "创作": " create ", "制作": " make ", "做一": " make a ",
    "做个": " make a ", "做成": " turn into ", "画一": " draw a ", "画个": " draw a ", "画出": " draw ",
    "绘制": " draw ", "绘画": " draw ", "画张": " draw a ", "画": " draw ", "画面": " scene ", "画风": " style ",
    "画质": " quality ", "渲染": " render ",
    "设计": " design ", "拍摄": " generate ", "拍一": " generate a ", "来一": " generate a ", "出一": " generate a ",
    "动起来": " animate ", "动画化": " animate ", "让它动": " animate ", "可视化": " visualize ",
    "给我一": " give me a ", "给我": " give me ",
    # edit verbs
    "替换成": " replace with ", "替换为": " replace with ", "换成": " replace with ", "替换": " replace ",
    "修改": " modify ", "改成": " change into ", "改为": " change into ", "变成": " into ", "转换成": " into ",
    "转换为": " into ", "转成": " into ", "转为": " into ", "变为": " into ", "编辑": " edit ", "去掉": " remove ",
    "去除": " remove ", "删除": " remove ", "删掉": " remove ", "移除": " remove ", "抹掉": " erase ",
    "擦除": " erase ", "擦掉": " erase ", "添加": " add ", "加上": " add ", "增加": " add ", "加入": " add ",
    "加一": " add a ", "上色": " colorize ", "修复": " restore ", "换掉": " replace ", "换": " change ",
    "戴上": " put on ", "穿上": " put on ", "披上": " put on ", "让他": " make him ", "让她": " make her ",
    "让它": " make it ", "让这": " make this ", "让": " make ", "变化": " change ", "变得": " into ", "变": " into ",
    "放到": " place into ", "放在": " place into ", "放进": " place into ", "放入": " place into ",
    "置于": " place into ", "把": " turn ", "将": " turn ",
    # media nouns
    "图片": " image ", "图像": " image ", "照片": " photo ", "相片": " photo ", "插画": " illustration ",
    "插图": " illustration ", "海报": " poster ", "壁纸": " wallpaper ", "头像": " headshot ", "肖像": " portrait ",
    "自拍": " selfie ", "幅画": " painting ", "张画": " painting ", "油画": " oil painting ", "水彩画": " watercolor ",
    "素描": " drawing ", "画作": " painting ", "美图": " image ", "效果图": " image ", "一张图": " an image ",
    "张图": " image ", "这图": " this image ", "图中": " in the image ", "图里": " in the image ",
    "短视频": " video ", "视频": " video ", "影片": " video ", "短片": " clip ", "动画": " animation ",
    "片段": " clip ", "录像": " video ", "延时摄影": " timelapse ", "镜头": " camera moves ",
    "运镜": " camera moves ", "航拍": " drone shot ", "动图": " animation ", "图": " image ", "地图": " map ",
    "图书": " book ", "意图": " intent ",
    "慢动作": " slow motion ",
    # determiners that mark a given medium or subject
    "这张": " this ", "这幅": " this ", "这段": " this ", "这个": " this ", "这位": " this ", "这只": " this ",
    "这款": " this ", "这件": " this ", "该": " this ", "此": " this ", "这": " this ", "那张": " that ",
    "那个": " that ", "给定的": " given ", "提供的": " provided ", "上传的": " uploaded ", "我的": " my ",
    "我家的": " my ", "我们的": " our ", "我们家的": " our ", "自己的": " my ",
    "以下": " following ", "下面的": " following ", "原图": " original image ", "原视频": " original video ",
    # reference cues
    "同一个人": " same person ", "同一人": " same person ", "同一个角色": " same character ", "这个人": " this person ",
    "此人": " this person ", "人物": " character ", "角色": " character ", "女士": " woman ", "女人": " woman ",
    "女生": " woman ", "女孩": " girl ", "男士": " man ", "男人": " man ", "男生": " man ", "男孩": " boy ",
    "小孩": " child ", "孩子": " child ", "产品": " product ", "商品": " product ", "人脸": " face ",
    "面孔": " face ", "脸": " face ", "身份": " identity ", "证件照": " id photo ", "参考图片": " reference image ",
    "参考图": " reference image ", "参考照片": " reference photo ", "参照": " as reference ",
    "作为参考": " as reference ", "为参考": " as reference ", "参考": " as reference ", "宠物": " pet ",
    "小狗": " dog ", "小猫": " cat ", "猫咪": " cat ", "狗狗": " dog ", "熊猫": " panda ", "猫头鹰": " owl ",
    "热狗": " hot dog ", "猫": " cat ", "狗": " dog ", "玩具": " toy ", "物体": " object ", "吉祥物": " mascot ",
    "模特": " model ",
    # control cues
    "深度图": " depth map ", "深度": " depth map ", "姿态图": " pose map ", "姿态": " pose map ",
    "姿势": " pose map ", "动作序列": " pose sequence ", "骨架": " skeleton ", "骨骼": " skeleton ",
    "关键点": " pose keypoints ", "边缘图": " edge map ", "边缘": " edge map ", "轮廓": " edge map ",
    "线稿": " line art ", "线条稿": " line art ", "草图": " scribble ", "涂鸦": " scribble ",
    "分割图": " segmentation map ", "控制图": " control image ", "控制视频": " control video ",
    "按照": " following ", "遵循": " following ", "依照": " following ", "跟随": " following ",
    # masks, and the region a mask marks
    "白色区域": " white area ", "标记区域": " marked area ", "标记的区域": " marked area ",
    "标出的区域": " marked area ",
    "选中区域": " selected area ", "选中的区域": " selected area ", "选区": " selected area ",
    "涂抹区域": " painted area ", "涂抹的区域": " painted area ", "区域": " area ",
    "遮罩": " mask ", "蒙版": " mask ", "蒙板": " mask ", "掩码": " mask ", "掩膜": " mask ",
    # frames
    "首帧": " first frame ", "第一帧": " first frame ", "第1帧": " first frame ", "起始帧": " first frame ",
    "开始帧": " first frame ", "开头帧": " first frame ", "尾帧": " last frame ", "末帧": " last frame ",
    "最后一帧": " last frame ", "结束帧": " last frame ", "最后帧": " last frame ", "结尾帧": " last frame ",
    "开头": " starts with ", "开始于": " starts with ", "起始于": " starts with ", "开始": " starting from ",
    "结尾": " ends with ", "结束于": " ends with ", "结束": " ends with ", "收尾": " ends with ",
    # size and shape
    "横屏": " landscape format ", "横版": " landscape format ", "横向": " landscape format ",
    "竖屏": " vertical format ", "竖版": " vertical format ", "竖向": " vertical format ",
    "竖幅": " vertical format ", "横幅": " landscape format ", "正方形": " square format ",
    "方形": " square format ", "方图": " square format ", "宽屏": " widescreen ", "超宽屏": " ultrawide ",
    "电影感画幅": " cinematic aspect ", "宽高比": " aspect ratio ", "比例": " aspect ratio ",
    "画幅": " aspect ratio ", "分辨率": " resolution ", "像素": " px ", "全高清": " full hd ",
    "超高清": " uhd ", "高清": " hd ", "标清": " 480p ",
}  # fmt: skip

_PHRASE = re.compile("|".join(re.escape(p) for p in sorted(PHRASES, key=len, reverse=True)))
_FULL_WIDTH_DIGITS = str.maketrans("０１２３４５６７８９．：／", "0123456789.:/")
# Anything CJK (or full-width) that makes the rewrite worth doing; pure-ASCII text skips it entirely.
_NEEDS_REWRITE = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef“”]")


# Between Chinese and ASCII letters/digits ("720p的", "16:9的"): a space, so word boundaries hold.
_CJK_ASCII_SEAM = re.compile(r"(?<=[\u4e00-\u9fff])(?=[A-Za-z0-9])|(?<=[A-Za-z0-9%])(?=[\u4e00-\u9fff])")


def rewrite_chinese(text: str) -> str:
    """``text`` with its Chinese cues replaced by the English ones; unchanged when it has none."""
    if text.isascii() or not _NEEDS_REWRITE.search(text):  # isascii(): a flag lookup, no scan
        return text
    text = text.translate(_FULL_WIDTH_DIGITS)
    for cue, replace in _NUMBER_RULES:
        text = cue.sub(replace, text)
    text = _PHRASE.sub(lambda m: PHRASES[m.group(0)], text)
    return _CJK_ASCII_SEAM.sub(" ", text)
