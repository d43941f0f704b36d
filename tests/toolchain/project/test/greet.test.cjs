test("greets", () => {
  expect(`hello ${"jest"}`).toBe("hello jest");
});
