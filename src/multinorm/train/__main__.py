from multinorm.train.cli import main

raise SystemExit(main())
